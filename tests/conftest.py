from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn serves on asyncio only, so the whole suite runs there.
    return "asyncio"
