"""The producer half of a two-inferlet pipeline (run messaging-consumer beside it, same user).

Jobs go out on the work queue `jobs:<channel>` (push/pull: each job reaches exactly one consumer), answers
come back on `answers:<channel>`, and consumers announce each job they finish on the broadcast topic
`progress:<channel>`, which this producer follows with a subscription.
"""

import json

from inferlet import messaging

STOP = "__stop__"


async def main(input: dict) -> dict:
    prompts = input.get("prompts") or []
    if isinstance(prompts, str):
        prompts = json.loads(prompts)
    channel = str(input.get("channel", "default"))
    with messaging.subscribe(f"progress:{channel}") as progress:
        for i, prompt in enumerate(prompts):
            messaging.push(f"jobs:{channel}", json.dumps({"id": i, "prompt": prompt}))
        answers = {}
        while len(answers) < len(prompts):
            answer = json.loads(await messaging.pull(f"answers:{channel}"))
            answers[answer["id"]] = answer
        notices = [await progress.next() for _ in prompts]
    for _ in range(int(input.get("consumers", 1))):
        messaging.push(f"jobs:{channel}", STOP)
    ordered = [answers[i] for i in range(len(prompts))]
    return {"answers": [a["text"] for a in ordered], "workers": sorted({a["worker"] for a in ordered}),
            "progress_notices": len(notices)}
