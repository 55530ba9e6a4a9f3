"""The models, by config name (`model.name`)."""

from trainer.models.base import BaseModel
from trainer.models.dien import DIEN
from trainer.models.din import DIN

MODELS = {"base": BaseModel, "din": DIN, "dien": DIEN}
