"""The ``cbam-deploy`` entry point (also ``python -m cbam_deploy``): the Ctrl-C handler goes in
before anything heavy (typer, torch, onnxruntime) is imported, so an interrupt at any moment gives
exit code 130 and one line, never a ``KeyboardInterrupt`` traceback."""

from __future__ import annotations

from cbam_deploy import interrupts


def main() -> None:
    interrupts.install()
    try:
        from cbam_deploy.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        interrupts.exit_interrupted()
    except BaseException:
        if interrupts.interrupted():  # what a library made of a Ctrl-C (an ImportError, a ValueError)
            interrupts.exit_interrupted()
        raise


if __name__ == "__main__":
    main()
