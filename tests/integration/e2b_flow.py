"""An application written for E2B, unchanged: run by tests/integration/test_e2b.py with the Python of a venv that
holds E2B's SDKs (tests/e2b_sdk.py), pointed at the appliance by E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY only.
Prints one JSON object per observation; the test checks them. Imports nothing of the appliance."""

import json
import sys

from e2b_code_interpreter import Sandbox


def say(step, **observed):
    print(json.dumps({"step": step, **observed}), flush=True)


def failure(call):
    try:
        call()
    except Exception as exc:  # the SDK's exception for an unsupported or refused call
        return f"{type(exc).__name__}: {exc}"
    return None


sandbox = Sandbox.create(timeout=600, metadata={"app": "e2b-flow"})
say("created", id=sandbox.sandbox_id)
first = sandbox.run_code("x = 41\nprint('hello')\nx + 1")
say("run_code", text=first.text, stdout=first.logs.stdout, error=first.error and first.error.name)
state = sandbox.run_code("x")
say("state", text=state.text)
error = sandbox.run_code("1/0").error
say("error", name=error.name, value=error.value, traceback=error.traceback)
frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})").results
say("dataframe", formats=[list(result.formats()) for result in frame], html=frame[0].html if frame else None)
shell = sandbox.run_code("echo from bash", language="bash")
say("bash", stdout=shell.logs.stdout)
info = sandbox.get_info()
say("info", id=info.sandbox_id, state=str(getattr(info.state, "value", info.state)), metadata=info.metadata)
listed = Sandbox.list().next_items()
say("list", ids=[item.sandbox_id for item in listed])
sandbox.set_timeout(900)
say("set_timeout")
sandbox.pause()
paused = Sandbox.get_info(sandbox.sandbox_id)
say("paused", state=str(getattr(paused.state, "value", paused.state)))
again = Sandbox.connect(sandbox.sandbox_id)
say("connected", text=again.run_code("x").text)
say("commands", failure=failure(lambda: again.commands.run("echo hi")))
say("contexts", failure=failure(lambda: again.create_code_context()))
again.kill()
say("killed", failure=failure(lambda: Sandbox.get_info(sandbox.sandbox_id)))
sys.exit(0)
