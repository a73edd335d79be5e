"""Grammar-constrained JSON: every sampled token is masked to what the schema still allows, so the
result parses and validates by construction (when it finishes within max_tokens)."""

import json

from inferlet import Context, Model, Sampler


async def main(input: dict) -> dict:
    model = Model.load(input.get("model", ""))
    schema = input.get("schema")
    if isinstance(schema, str):
        schema = json.loads(schema)
    temperature = float(input.get("temperature", 0.0))
    sampler = Sampler.top_p(temperature, 0.95) if temperature > 0 else Sampler.argmax()

    ctx = Context(model)
    instructions = "Answer with JSON only."
    if schema is not None:
        instructions += " It must follow this JSON schema: " + json.dumps(schema)
    ctx.system(instructions).user(str(input.get("prompt", "")))
    seed = input.get("seed")
    gen = ctx.generate(sampler, max_tokens=int(input.get("max_tokens", 256)),
                       seed=None if seed is None else int(seed))
    return await gen.collect_json(schema=json.dumps(schema) if schema is not None else None)
