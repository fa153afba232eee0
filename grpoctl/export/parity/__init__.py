"""Does a GGUF behave like the model it came from? Measured, not assumed.

For each GGUF, llama.cpp (``llama_cpp.Llama`` with all logits) and the reference, the base with the
adapter applied by PEFT's own LoRA layers in transformers (float32), read the same fixed probe
texts, teacher-forced on exactly the same token ids: prose, math, code, and chat conversations rendered
by the model's own template with the training system prompt. Per file: top-1 next-token agreement and
mean KL(reference || GGUF) over all positions, one greedy chat answer from each side, whether the ids
llama-server sends for the rendered chat are transformers' ids with one BOS, whether every end-of-turn token is an
end-of-generation token, and whether the chat template in the file, rendered by llama.cpp's own engine
(llama-server), gives the prompt the HF tokenizer's gives on the hard conversations of the Ollama check.
The noise floor (the same reference in bf16 vs float32 on the same probes) is measured in the same run, and
each file's floors give way to it (``following_noise``): how often a model's argmax flips under rounding is
the model's own property (near ties, a trained head, a big vocabulary), not its file type's.
The reference never uses grpoctl's merge code, so it can disagree with a file grpoctl merged wrong.

    probes.py     the fixed probe texts and their token ids
    reference.py  the PEFT reference in transformers (in memory or streamed), computed once per export
    llamacpp.py   the GGUF in llama.cpp: log-probabilities, greedy answer, tokenizer and chat template checks
    scoring.py    the metrics (top-1, KL) and the floors, following the run's own rounding noise
    measure.py    one GGUF against the reference: its ``artifacts.ParityResult``
    report.py     the ``artifacts.ParitySection``, parity.json, and the table people read

Import from the submodules; this package holds no code, so importing one loads only what it needs.
"""
