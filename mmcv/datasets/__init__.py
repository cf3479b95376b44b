"""Datasets of the standalone (miniature) world."""
from .builder import DATASETS, build_dataloader, build_dataset  # noqa: F401
from .chat_tokenizer import ChatTokenizer  # noqa: F401
from .synthetic_chat_b2d import SyntheticChatB2D, collate_chat_b2d  # noqa: F401
from .chat_b2d_metrics import ChatB2DMetrics, evaluate  # noqa: F401
from .chat_b2d_baseline import PriorBaseline, chance_levels  # noqa: F401
