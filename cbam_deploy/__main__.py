"""The ``cbam-deploy`` entry point (also ``python -m cbam_deploy``): the Ctrl-C handler goes in
before anything heavy (typer, torch, onnxruntime) is imported, so an interrupt at any moment gives
exit code 130 and one line, never a ``KeyboardInterrupt`` traceback."""

from __future__ import annotations

import signal

from cbam_deploy import interrupts


def main() -> None:
    interrupts.install()
    try:
        from cbam_deploy.transaction import faultpoint  # light: errors, fsutil, interrupts

        faultpoint("startup")  # the tests' hook: Ctrl-C from here on, through every import below
        from cbam_deploy.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        interrupts.exit_interrupted()
    except SystemExit as exc:  # the CLI's own exit: its line is printed already when it is 130
        if interrupts.interrupted() and exc.code != interrupts.EXIT_CODE:
            interrupts.exit_interrupted()
        raise
    except BaseException:
        if interrupts.interrupted():  # what a library made of a Ctrl-C (an ImportError, a ValueError)
            interrupts.exit_interrupted()
        raise
    finally:  # the work is done and its line printed: a Ctrl-C while the interpreter winds down changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
