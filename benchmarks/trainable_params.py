"""Trainable parameters of ViT-L/16 with LoRA of rank 8 and 64 on all six families, checked by arithmetic.

    python benchmarks/trainable_params.py

Counted: every parameter of ViTForImageClassification (ViT-L/16, 224x224, 1000 classes: embeddings,
24 encoder layers, final norm, head) = the denominator. LoRA on a d_in x d_out linear adds
r*(d_in + d_out). Per layer: q, k, v, o (1024->1024): 4 * 2048r; fc1 (1024->4096) and fc2
(4096->1024): 2 * 5120r; 18432r per layer, 24 layers = 442,368r: 3.54M at r=8, 28.3M at r=64.
"LoRA only" is the paper's LoRA phase (everything else frozen); "+ head, norms, embeddings" keeps
those training too (prelora.trainable_after_freeze).
"""

from __future__ import annotations

import torch
from common import write_json

from prelora_ray.adapters.lora import inject_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.config import ModelSettings
from prelora_ray.models import FAMILY_MODULES, build_model
from prelora_ray.strategies import Phase
from prelora_ray.strategies.prelora import PreLoRASettings


def main() -> None:
    rows = {}
    for rank in (8, 64):
        with torch.device("meta"):  # shapes only: no 1.2 GB of weights to fill
            model = build_model(ModelSettings(preset="vit-large"), num_classes=1000, image_size=224, num_channels=3)
        base_total = sum(p.numel() for p in model.parameters())
        ranks = {f: [rank] * 24 for f in FAMILY_MODULES}
        with torch.device("meta"):
            peft_model = inject_lora(model, ranks, PreLoRASettings(r_min=8, r_max=64))
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert lora == 24 * rank * 18432, (lora, 24 * rank * 18432)
        extra_groups = PreLoRASettings(r_min=8, r_max=64, trainable_after_freeze=("head", "norms", "embeddings"))
        set_trainable(peft_model, Phase.LORA, extra_groups)
        with_extra = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rows[rank] = {
            "vit_large_parameters": base_total,
            "lora_parameters": lora,
            "lora_fraction_of_vit": lora / base_total,
            "lora_plus_head_norms_embeddings": with_extra,
            "fraction_with_head_norms_embeddings": with_extra / base_total,
        }
    print("ViT-L/16 (224x224, 1000 classes); fractions relative to the plain ViT's parameters")
    print(f"{'rank':>5}{'ViT-L params':>15}{'LoRA params':>14}{'LoRA %':>9}{'+head/norms/emb':>17}{'%':>8}")
    for rank, r in rows.items():
        print(
            f"{rank:>5}{r['vit_large_parameters']:>15,}{r['lora_parameters']:>14,}"
            f"{100 * r['lora_fraction_of_vit']:>9.2f}"
            f"{r['lora_plus_head_norms_embeddings']:>17,}{100 * r['fraction_with_head_norms_embeddings']:>8.2f}"
        )
    assert abs(rows[8]["vit_large_parameters"] / 1e6 - 304.3) < 0.2
    assert (
        abs(100 * rows[8]["lora_fraction_of_vit"] - 1.16) < 0.01
        and abs(100 * rows[64]["lora_fraction_of_vit"] - 9.30) < 0.01
    )
    print(f"arithmetic checked; written {write_json('trainable_params', {'results': rows})}")


if __name__ == "__main__":
    main()
