"""Parity report: this project vs transformers on the same random checkpoints, per variant family.

For each variant (scaled-down copies of the published shapes: PG1 MQA; PG2 3B/10B GQA; PG2 28B with
head_dim 128-style query_pre_attn_scalar != head_dim; an "896"-style prompt longer than the sliding
window) it writes a checkpoint in the hub layout, loads it in both libraries and prints the max
relative logit difference (fp32 and bf16; reference eager and reference default kernels), and whether
24 greedy tokens agree.

    python benchmarks/parity.py
"""

from __future__ import annotations

import tempfile
import time

import torch

import paligemma
from paligemma.testing import tiny_config, write_random_checkpoint

VARIANTS = {
    "PG1 (gemma, MQA)": tiny_config("pg1"),
    "PG2 3B-like (GQA 4/2, softcaps)": tiny_config("pg2", sliding_window=4096, query_pre_attn_scalar=16),
    "PG2 10B-like (16/8 heads)": tiny_config("pg2", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                                             head_dim=16, query_pre_attn_scalar=16, sliding_window=4096),
    "PG2 28B-like (qpas 24 != head_dim 16)": tiny_config("pg2", sliding_window=4096),
    "PG2 896-like (window 6 < prompt)": tiny_config("pg2", sliding_window=6),
}


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((1, config.num_image_tokens), config.image_token_index),
                     torch.tensor([[2]]), torch.randint(5, 1000, (1, 8), generator=g), torch.tensor([[108]]),
                     torch.randint(5, 1000, (1, 4), generator=g)], 1)
    tt = torch.zeros_like(ids)
    tt[:, -4:] = 1
    pix = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, generator=g)
    return ids, tt, pix


def main() -> None:
    import transformers

    torch.manual_seed(0)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{'variant':40s} {'dtype':9s} {'vs eager':>10s} {'vs default':>11s} {'greedy 24':>10s}")
    for name, cfg in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            write_random_checkpoint(d, cfg, seed=3, tokenizer=False)
            for dtype in (torch.float32, torch.bfloat16):
                ours = paligemma.load_model(d, dtype=dtype, quantize=None)  # plain modules: the exact mode
                ids, tt, pix = inputs(ours.config)
                row = []
                for impl in ("eager", None):
                    kw = {"attn_implementation": impl} if impl else {}
                    ref = transformers.PaliGemmaForConditionalGeneration.from_pretrained(d, dtype=dtype, **kw).eval()
                    with torch.no_grad():
                        a = ours(ids, pix, token_type_ids=tt).logits.float()
                        b = ref(input_ids=ids, pixel_values=pix, token_type_ids=tt,
                                attention_mask=torch.ones_like(ids)).logits.float()
                    row.append(((a - b).abs().max() / b.abs().max()).item())
                prompt = ids[:, :-4]
                mine = ours.generate(prompt, pix, max_new_tokens=24, eos_token_ids=(-1,))
                theirs = ref.generate(input_ids=prompt, pixel_values=pix, attention_mask=torch.ones_like(prompt),
                                      token_type_ids=torch.zeros_like(prompt), max_new_tokens=24,
                                      min_new_tokens=24, do_sample=False)[:, prompt.shape[1]:]
                same = int((mine == theirs).cumprod(-1).sum())
                print(f"{name:40s} {str(dtype)[6:]:9s} {row[0]:10.2e} {row[1]:11.2e} {same:>7d}/24")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"done in {time.time() - t:.1f} s")
