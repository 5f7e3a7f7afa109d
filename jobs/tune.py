"""Entry point for `ray job submit ... -- python jobs/tune.py ARGS`: the same arguments as `gtc-ray tune`."""

from _common import run

if __name__ == "__main__":
    run("tune")
