"""`python -m sim decision-service --port P --token T [options]` or
`python -m sim staging-runner --port P --token T [options]`; `--help` after the service name
lists its options (docs/reference_services.md describes them all)."""

from __future__ import annotations

import sys

from sim import decision_service, staging_runner

SERVICES = {"decision-service": decision_service.main, "staging-runner": staging_runner.main}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in SERVICES:
        sys.exit(
            f"usage: python -m sim {{{'|'.join(SERVICES)}}} --port P --token T [...]\n"
            "       python -m sim SERVICE --help   (its options)"
        )
    SERVICES[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
