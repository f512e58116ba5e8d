"""Knowledge distillation and quantization-aware training."""

from quantjax.distill.losses import cross_entropy, distill_loss, hidden_mse, kd_logits_loss
from quantjax.distill.qat import lsq_apply, lsq_convert, lsq_init
from quantjax.distill.trainer import TrainConfig, fit, make_optimizer

__all__ = ["TrainConfig", "cross_entropy", "distill_loss", "fit", "hidden_mse", "kd_logits_loss",
           "lsq_apply", "lsq_convert", "lsq_init", "make_optimizer"]
