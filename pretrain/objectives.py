"""The objective table: `objective` name -> the method ("module:attribute", a `Method`: its config
section and its build function). Explicit, not a registry: grep a name to find its file. A method's
module is imported only when a run picks it (MILAN's pulls in open_clip, BEiT's does not).
"""

from __future__ import annotations


from mimkit.config import describe_keys, format_keys, load_section, table_entry
from mimkit.pretrain.objective import Method, Objective

OBJECTIVES: dict[str, str] = {
    "beit": "mimkit.pretrain.beit:BEIT",  # DALL-E dVAE tokens
    "peco": "mimkit.pretrain.beit:BEIT",  # the same, perceptual-codebook tokens (another tokenizer export)
    "beitv2": "mimkit.pretrain.beit:BEITV2",  # VQ-KD tokens + CLS head on an early layer
    "milan": "mimkit.pretrain.milan:MILAN",  # teacher features, guided masking, prompting decoder
    "mae": "mimkit.pretrain.mae:MAE",  # normalised pixels
    "eva": "mimkit.pretrain.eva:EVA",  # teacher features at masked positions
    "simmim": "mimkit.pretrain.simmim:SIMMIM",  # raw pixels, 32 px mask units, linear head, L1
}


def method_for(objective: str) -> Method:
    return table_entry(OBJECTIVES, objective, "objective")


def resolve_method(cfg):
    """The run's `method:` section validated against the chosen objective's schema (parse time)."""
    cfg.method = load_section(method_for(cfg.objective).config, cfg.method, "method")
    return cfg


def build_objective(cfg) -> Objective:
    return method_for(cfg.objective).build(cfg, cfg.method)


def method_help() -> str:
    """`pretrain --help`'s `method` sections: each objective's keys (objectives sharing a method, one list)."""
    by_method: dict[str, list[str]] = {}
    for name, target in OBJECTIVES.items():
        by_method.setdefault(target, []).append(name)
    return "\n\n".join(format_keys(describe_keys(method_for(names[0]).config, "method."),
                                   f"[method] with objective={' | '.join(names)}")
                       for names in by_method.values())
