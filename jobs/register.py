"""Entry point for `ray job submit ... -- python jobs/register.py ARGS`: the same arguments as `gtc-ray register`."""

from _common import run

if __name__ == "__main__":
    run("register")
