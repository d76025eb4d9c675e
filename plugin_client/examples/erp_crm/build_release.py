"""Build a release artifact of the example plugin: `python build_release.py 1.2.3` writes
erp_crm-1.2.3.tgz (one top-level directory, plugin.yaml + src/). `--broken` builds a version
whose health check fails, to watch FolderUpdater switch back and the command fail."""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(version: str, *, broken: bool, out: Path) -> Path:
    source = HERE / "plugin"
    artifact = out / f"erp_crm-{version}.tgz"
    with tarfile.open(artifact, "w:gz") as tar:
        for path in sorted(source.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            text = path.read_text()
            text = text.replace('version: "1.2.2"', f'version: "{version}"')
            text = text.replace('VERSION = "1.2.2"', f'VERSION = "{version}"')
            if broken:
                text = text.replace("HEALTHY = True", "HEALTHY = False")
            data = text.encode()
            info = tarfile.TarInfo(f"erp_crm-{version}/{path.relative_to(source).as_posix()}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("version")
    parser.add_argument("--broken", action="store_true", help="health() returns False")
    parser.add_argument("--out", type=Path, default=Path.cwd())
    args = parser.parse_args()
    print(build(args.version, broken=args.broken, out=args.out))


if __name__ == "__main__":
    main()
