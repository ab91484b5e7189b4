"""The baseline for the acknowledgement rate: FastAPI with one endpoint that only parses the form.

Served exactly like the app (`uvicorn bench.bare_app:app --no-access-log`, one worker), it is the
most a FastAPI robot handler can do on this machine before it does anything of its own.
"""

from urllib.parse import parse_qsl

from fastapi import FastAPI, Request

app = FastAPI(title="bare form endpoint")


@app.post("/robot")
async def robot(request: Request) -> dict[str, object]:
    """Read the body and split the form, nothing else."""
    body = await request.body()
    fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {"status": "accepted", "fields": len(fields)}
