"""The consumer half of a two-inferlet pipeline (see messaging-producer): pull a job, answer it, push
the answer, broadcast a progress notice; stop at the producer's stop message."""

import json

from inferlet import Context, Model, Sampler, messaging, runtime

STOP = "__stop__"


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    channel = str(input.get("channel", "default"))
    max_tokens = int(input.get("max_tokens", 32))
    handled = 0
    while True:
        message = await messaging.pull(f"jobs:{channel}")
        if message == STOP:
            return {"handled": handled}
        job = json.loads(message)
        ctx = Context(model)
        ctx.user(job["prompt"])
        text = await ctx.generate(Sampler.argmax(), max_tokens=max_tokens).collect_text()
        ctx.release()
        messaging.push(f"answers:{channel}", json.dumps({"id": job["id"], "text": text,
                                                          "worker": runtime.instance_id()}))
        messaging.broadcast(f"progress:{channel}", f"{runtime.instance_id()} finished job {job['id']}")
        handled += 1
