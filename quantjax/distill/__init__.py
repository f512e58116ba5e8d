"""Knowledge distillation and quantization-aware training."""

from quantjax.distill.losses import cross_entropy, distill_loss, hidden_mse, kd_logits_loss
from quantjax.distill.qat import lsq_apply, lsq_convert, lsq_init
from quantjax.distill.adapters import adapter_param_count, lora_convert, lora_init, lora_merge
from quantjax.distill.regimes import REGIMES, Regime, training_regime
from quantjax.distill.trainer import TrainConfig, fit, make_optimizer, step_memory

__all__ = ["REGIMES", "Regime", "TrainConfig", "adapter_param_count", "cross_entropy",
           "distill_loss", "fit", "hidden_mse", "kd_logits_loss", "lora_convert", "lora_init",
           "lora_merge", "lsq_apply", "lsq_convert", "lsq_init", "make_optimizer", "step_memory",
           "training_regime"]
