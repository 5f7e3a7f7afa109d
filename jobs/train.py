"""Entry point for `ray job submit ... -- python jobs/train.py ARGS`: the same arguments as `gtc-ray train`."""

from _common import run

if __name__ == "__main__":
    run("train")
