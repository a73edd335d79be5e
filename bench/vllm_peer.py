"""vLLM's `LLM.generate` on a given checkpoint and workload: the peer that bench/serve_throughput.py runs.

Runs under vLLM's own interpreter (a separate virtual environment; vLLM is never installed beside pie), so it
imports nothing from pie. The workload comes as JSON, the result goes back as JSON:

    ~/vllm-venv/bin/python bench/vllm_peer.py WORKLOAD.json RESULT.json

WORKLOAD: {"model": dir, "dtype": "float32", "prompts": [[token ids]], "out_lens": [int], "max_num_seqs": int}
RESULT:   {"seconds": float, "output_tokens": int, "tokens": [[generated ids]], "vllm": version}

Prompts go in as token ids with `skip_tokenizer_init` (the benchmark checkpoints have no tokenizer), greedy,
`ignore_eos` with `min_tokens` = `max_tokens` = each sequence's output length, so every system generates
exactly the same number of tokens. One short warm-up generate runs first and is not timed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], skip_tokenizer_init=True,
              max_num_seqs=int(spec["max_num_seqs"]), seed=0)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)

    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"][:4]], [params(4)] * 4,
                 use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    sampling = [params(n) for n in spec["out_lens"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    for got, want in zip(tokens, spec["out_lens"], strict=True):
        if len(got) != want:
            raise SystemExit(f"vLLM generated {len(got)} tokens for a sequence asked for {want}")
    Path(sys.argv[2]).write_text(json.dumps({"seconds": seconds, "output_tokens": sum(map(len, tokens)),
                                             "tokens": tokens, "vllm": vllm.__version__}))


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from re-running main
    main()
