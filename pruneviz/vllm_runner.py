"""Run one exported folder in vLLM and print what it generated: the other side of :mod:`pruneviz.vllm_runtime`.

This file is executed by the *vLLM* interpreter (``make vllm`` builds ``.venv-vllm``: vLLM pins an older
transformers than pruneviz, so the two cannot share one environment). It imports nothing from pruneviz and
nothing but vLLM and the standard library::

    .venv-vllm/bin/python pruneviz/vllm_runner.py request.json

``request.json``: ``{"folder", "prompt_ids", "new_tokens", "logprobs", "trust_remote_code", "dtype",
"max_model_len", "timed_tokens", "timed_rounds"}``. The result is one line on stdout, ``PRUNEVIZ_VLLM_RESULT
{json}``: the greedy tokens (``temperature=0``, EOS ignored), the top ``logprobs`` log-probabilities at every
generated position, vLLM's version and config class, the seconds to build the engine, and (``timed_tokens`` > 0)
the wall-clock seconds of ``timed_rounds`` greedy generations of that many tokens after a warm-up, at batch 1.
Eager mode (no graph compilation: the check must start quickly, and compilation would time its own warm-up).
"""
from __future__ import annotations

import json
import sys
import time

MARK = "PRUNEVIZ_VLLM_RESULT "  # also read by pruneviz.vllm_runtime, which imports this module


def main(path: str) -> None:
    req = json.loads(open(path, encoding="utf-8").read())
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=req["folder"], trust_remote_code=bool(req["trust_remote_code"]), dtype=req.get("dtype", "float32"),
              max_model_len=int(req.get("max_model_len", 512)), enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    prompt = {"prompt_token_ids": list(req["prompt_ids"])}
    greedy = SamplingParams(temperature=0, max_tokens=int(req["new_tokens"]), logprobs=int(req["logprobs"]),
                            ignore_eos=True)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
    # one {token id: log-probability} per generated position: vLLM's top ``logprobs`` and the chosen token
    rows = [{str(k): v.logprob for k, v in pos.items()} for pos in out.logprobs]
    result = {"greedy": list(out.token_ids), "logprobs": rows,
              "vllm_version": vllm.__version__, "load_s": load_s,
              "architecture": type(llm.llm_engine.model_config.hf_config).__name__}
    n = int(req.get("timed_tokens", 0))
    if n:
        timed = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([prompt], timed, use_tqdm=False)  # warm-up
        result["generate_s"] = []
        for _ in range(int(req.get("timed_rounds", 3))):
            t0 = time.perf_counter()
            llm.generate([prompt], timed, use_tqdm=False)
            result["generate_s"].append(time.perf_counter() - t0)
        result["timed_tokens"] = n
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this module
    main(sys.argv[1])
