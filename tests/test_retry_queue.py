"""The retry queue survives the process that filled it being killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from dualwrite import Settings, open_dualwrite


def test_a_pending_write_survives_sigkill_and_lands_after_restart(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DUALWRITE_STORE_URL": f"sqlite:///{tmp_path}/messages.db",
        "DUALWRITE_QUEUE_PATH": str(tmp_path / "queue.db"),
    }
    child = textwrap.dedent(
        """
        import asyncio, sys, time
        from dualwrite import Settings, User, open_dualwrite
        from dualwrite.backends import create_permanent_store
        from dualwrite.faults import Faults, FaultyPermanentStore

        async def main():
            settings = Settings.from_env()
            faults = Faults(); faults.fail()
            store = FaultyPermanentStore(create_permanent_store(settings.store_url), faults)
            async with open_dualwrite(settings, store=store) as dw:
                result = await dw.send_message("ws", "general", "survive", User("u1", "Ada"))
                print(result.message_id, result.status, flush=True)
                time.sleep(60)  # killed here, with the event loop blocked

        asyncio.run(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    message_id, status = process.stdout.readline().split()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert status == "pending"

    import asyncio

    async def restart() -> None:
        settings = Settings.from_env(env)
        async with open_dualwrite(settings, background=False) as dw:
            [entry] = await dw.pending()
            assert entry.message_id == message_id and entry.write.text == "survive"
            assert (await dw.retry_all()).saved == [message_id]
            history = await dw.history("ws", "general")
            assert [(m.message_id, m.text, m.saved) for m in history.messages] == [
                (message_id, "survive", True)
            ]

    asyncio.run(restart())
