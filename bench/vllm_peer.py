"""vLLM's `LLM.generate` on a given checkpoint and workload: the peer that bench/serve_throughput.py runs.

Runs under vLLM's own interpreter (a separate virtual environment; vLLM is never installed beside pie), so it
imports nothing from pie. The workload comes as JSON, the result goes back as JSON:

    ~/vllm-venv/bin/python bench/vllm_peer.py WORKLOAD.json

WORKLOAD: {"model": dir, "dtype": "float32", "prompts": [[token ids]], "out_lens": [int], "max_num_seqs": int}

It loads the model, runs one short untimed warm-up generate, prints `VLLM_PEER {"ready": version}`, then runs the whole
workload once for every line `go` on stdin and prints `VLLM_PEER {"seconds": float, "output_tokens": int}` after each;
`quit` (or the end of stdin) ends it. So the caller can alternate vLLM's rounds with its own on a shared
host, where load changes between minutes. Prompts go in as token ids with `skip_tokenizer_init` (the
benchmark checkpoints have no tokenizer), greedy, `ignore_eos` with `min_tokens` = `max_tokens` = each
sequence's output length, so every system generates exactly the same number of tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TAG = "VLLM_PEER"  # marks this script's lines among vLLM's own log lines on stdout


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
    print(TAG, json.dumps({"ready": vllm.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - t0
        lens = [len(o.outputs[0].token_ids) for o in outs]
        if lens != spec["out_lens"]:
            raise SystemExit("vLLM generated other output lengths than asked for")
        print(TAG, json.dumps({"seconds": seconds, "output_tokens": sum(lens)}), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core: the guard keeps the child from re-running main
    main()
