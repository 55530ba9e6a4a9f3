"""The models, by config name (`model.name`); docs/models.md describes each one."""

from trainer.models.base import BaseModel
from trainer.models.dcn import DCN
from trainer.models.deepfm import DeepFM
from trainer.models.dien import DIEN
from trainer.models.din import DIN
from trainer.models.lr import LR
from trainer.models.mian import MIAN
from trainer.models.pnn import PNN
from trainer.models.wide_deep import WideDeep
from trainer.models.xdeepfm import XDeepFM

MODELS = {
    "lr": LR,
    "base": BaseModel,
    "wide_deep": WideDeep,
    "pnn": PNN,
    "deepfm": DeepFM,
    "dcn": DCN,
    "xdeepfm": XDeepFM,
    "din": DIN,
    "dien": DIEN,
    "mian": MIAN,
}
