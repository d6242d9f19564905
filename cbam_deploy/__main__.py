"""The ``cbam-deploy`` entry point (also ``python -m cbam_deploy``): the Ctrl-C handler goes in
before anything heavy (typer, torch, onnxruntime) is imported, so an interrupt at any moment gives
exit code 130 and one line, never a ``KeyboardInterrupt`` traceback."""

from __future__ import annotations

import signal

from cbam_deploy import interrupts


def main() -> None:
    interrupts.install()
    try:
        from cbam_deploy.transaction import faultpoint  # lazy: after the handler (light: errors, fsutil, interrupts)

        faultpoint("startup")  # the tests' hook: Ctrl-C from here on, through every import below
        from cbam_deploy.cli import main as cli_main  # lazy: after the handler, so Ctrl-C during imports is one line

        cli_main()
    except KeyboardInterrupt:
        pass
    except BaseException:  # SystemExit too: the CLI's own exit, or what a library made of a Ctrl-C
        if not interrupts.interrupted():
            raise
    finally:  # the work is done and its line printed: a Ctrl-C while the interpreter winds down changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if interrupts.interrupted():
        interrupts.leave()


if __name__ == "__main__":
    main()
