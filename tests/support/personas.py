"""Ops users of the API (viewer, operator, admin) with their bearer tokens, and the passwords
they sign in to the dashboard with."""

from __future__ import annotations

from dataclasses import dataclass

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.ops.security import add_user


@dataclass
class Persona:
    username: str
    role: str
    token: str
    password: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def make_user(
    settings: Settings, username: str, role: str, *, tenants: list[str] | None = None
) -> Persona:
    """A new ops user (limited to `tenants` when given: they must exist)."""
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            user = await add_user(session, username, role, tenants=tenants)
    finally:
        await engine.dispose()
    return Persona(user.username, user.role, user.token, user.password)
