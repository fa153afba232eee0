"""A stub of ``vllm serve`` for CPU tests: vLLM's command line and the OpenAI endpoints grpoctl uses, answered
by transformers (+ PEFT for ``--lora-modules``) in float32 on the CPU.

It is not vLLM: it proves grpoctl's side of the protocol (argv, /health, /v1/models, chat completions, prompt
log-probabilities, process lifecycle) where no GPU exists; the real server is exercised on a GPU machine
(bench/vllm_gpu.md). ``STUB_VLLM_DROP_LORA=1`` serves the base model under the adapter's name, the way a
server that ignores the adapter would, so parity has something to catch; ``STUB_VLLM_ALL_REASONING=1`` returns
the answer as ``reasoning_content``, as vLLM's reasoning parser does for an answer cut inside ``<think>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm serve")
    p.add_argument("model")
    p.add_argument("--served-model-name")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--lora-modules", nargs="+", default=[])
    p.add_argument("--tokenizer")
    p.add_argument("--chat-template")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args, _ = p.parse_known_args(argv)  # the rest (dtype, memory, parallelism, parsers) means nothing on a CPU
    return args


def main() -> None:
    if sys.argv[1:2] != ["serve"]:
        sys.exit("stub vllm: only `serve` is implemented")
    args = parse(sys.argv[2:])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.chat_template:
        tok.chat_template = open(args.chat_template).read()
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    models = {args.served_model_name or args.model: base}
    for item in args.lora_modules:
        name, path = item.split("=", 1)
        if os.environ.get("STUB_VLLM_DROP_LORA") == "1":
            models[name] = base
            continue
        from peft import PeftModel

        fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(fresh, path).eval()
    eos = tok.eos_token_id

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            sys.stderr.write("INFO:     " + (a[0] % a[1:]) + "\n")

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"data": [{"id": n, "object": "model"} for n in models]})
            else:
                self._send(404, {"error": self.path})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            model = models.get(body.get("model"))
            if model is None:
                return self._send(404, {"error": f"model {body.get('model')!r} not found"})
            with torch.no_grad():
                if self.path == "/v1/chat/completions":
                    ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
                    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=body.get("max_tokens", 16),
                                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
                    new = out[0, len(ids):].tolist()
                    finish = "stop" if eos in new else "length"
                    text = tok.decode(new, skip_special_tokens=True)
                    message = {"role": "assistant", "content": text}
                    if os.environ.get("STUB_VLLM_ALL_REASONING") == "1":
                        # what vLLM's reasoning parser returns for an answer cut inside a pre-filled <think>
                        message = {"role": "assistant", "content": None, "reasoning_content": text}
                    return self._send(200, {"choices": [{"message": message, "finish_reason": finish}]})
                if self.path == "/v1/completions":
                    ids = body["prompt"]
                    k = int(body.get("prompt_logprobs") or 0)
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                    rows: list = [None]
                    for i in range(1, len(ids)):
                        lp = logp[i - 1]
                        top = torch.topk(lp, k).indices.tolist()
                        order = torch.argsort(lp, descending=True)
                        ranks = {int(t): r + 1 for r, t in enumerate(order[: max(k, 1)].tolist())}
                        keep = dict.fromkeys([ids[i], *top])
                        rows.append({str(t): {"logprob": float(lp[t]), "rank": ranks.get(t, k + 1)} for t in keep})
                    return self._send(200, {"choices": [{"text": "", "prompt_logprobs": rows}]})
            self._send(404, {"error": self.path})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    sys.stderr.write(f"INFO:     stub vLLM serving {list(models)} on {args.host}:{args.port}\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
