"""``info``: a bundle's manifest, with every artifact's files checked against the sha256 it records."""

from __future__ import annotations

from .bundle import Bundle
from .devices import image_stack
from .results import Result


class InfoResult(Result):
    """The manifest, each artifact with its ``integrity`` ("ok", "changed", "missing" or "unsafe"), and the
    software stack of the cbam-deploy Docker image it runs in (``image_stack``, where it does). Exit code
    3 when an artifact's files are not the ones the manifest recorded."""

    command = "info"

    def __init__(self, data: dict, bundle: Bundle) -> None:
        super().__init__(data)
        self.bundle = bundle

    @property
    def integrity(self) -> dict[str, str]:
        return {a["name"]: a["integrity"] for a in self["artifacts"]}

    @property
    def passed(self) -> bool:
        return all(state == "ok" for state in self.integrity.values())

    @property
    def failure(self) -> str | None:
        broken = [f"{name} ({state})" for name, state in self.integrity.items() if state != "ok"]
        if not broken:
            return None
        unsafe = ("; unsafe: a symbolic link, not a regular file, or a file the manifest does not record, never read"
                  if "unsafe" in self.integrity.values() else "")
        return (f"integrity check failed for {', '.join(broken)}: the files are not the ones the manifest recorded "
                f"(sha256){unsafe}; rebuild these artifacts or re-export the bundle")


def bundle_info(bundle_dir) -> InfoResult:
    """The bundle's manifest with each artifact's integrity (its files hashed once)."""
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle.open(bundle_dir)
    integrity = bundle.check_integrity()
    stack = image_stack()  # the pinned stack of a cbam-deploy Docker image; None elsewhere
    artifacts = [{**a.raw, "integrity": integrity[a.name]} for a in bundle.artifacts]
    return InfoResult({**bundle.manifest, "artifacts": artifacts, **({"image_stack": stack} if stack else {})}, bundle)
