"""`python -m app.cli ...`: the same as the `selfheal` console script. `selfheal up` and the
simulator start their worker and API processes this way (with the running interpreter)."""

from app.cli import main

if __name__ == "__main__":
    main()
