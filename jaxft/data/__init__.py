"""The data pipeline: local or hub datasets -> chat-rendered, loss-masked token examples -> mixed, packed rows.

    cfg = data_config_from_dict(yaml_dict["data"])
    check_sources(cfg)                         # read and parse the files without a tokenizer (--check)
    prepared = prepare(cfg, tokenizer)         # raises jaxft.errors types before any compute
    batches = prepared.train_batches(batch_size=8, seed=0)
    batch = next(batches)                      # input_ids, segment_ids, positions, loss_mask: [8, cfg.seq_len]
    state = batches.state()                    # {"epoch", "position", "num_rows"}; batches.restore(state) resumes
"""

from jaxft.data.batches import Batches, eval_batches
from jaxft.data.config import DataConfig, SourceConfig, data_config_from_dict
from jaxft.data.formats import Conversation, detect_format, parse_record
from jaxft.data.mixing import draw_indices, mix, mixture_counts, mixture_probabilities
from jaxft.data.packing import build_rows, efficiency, one_per_row, pack_bfd
from jaxft.data.pipeline import Prepared, check_sources, prepare
from jaxft.data.render import Example, Renderer, truncate
from jaxft.data.stats import SourceStats, SplitTotals, Stats

__all__ = [
    "Batches",
    "Conversation",
    "DataConfig",
    "Example",
    "Prepared",
    "Renderer",
    "SourceConfig",
    "SourceStats",
    "SplitTotals",
    "Stats",
    "build_rows",
    "check_sources",
    "data_config_from_dict",
    "detect_format",
    "draw_indices",
    "efficiency",
    "eval_batches",
    "mix",
    "mixture_counts",
    "mixture_probabilities",
    "one_per_row",
    "pack_bfd",
    "parse_record",
    "prepare",
    "truncate",
]
