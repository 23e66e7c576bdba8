"""Loss terms shared by every method's finetuning: distillation from the dense model."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pumer_plug.errors import UserError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the logits softened by ``tau``, times tau^2 (Hinton et al. 2015;
    DynamicViT's ``cls_kl_loss`` and PuMer's ``kd_loss`` at tau = 1).

    Shapes:
        student_logits (B, K), teacher_logits (B, K) -> scalar
    """
    student = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * tau**2


def hidden_distillation_loss(student_outputs: Any, teacher_outputs: Any) -> torch.Tensor:
    """MSE between the first token of the student's and the teacher's final hidden states.

    Shapes:
        hidden_states[-1] (B, N_student, C) and (B, N_teacher, C) -> scalar

    Raises:
        UserError: the outputs carry no hidden states (the model ignores ``output_hidden_states``).
    """
    student, teacher = student_outputs.hidden_states, teacher_outputs.hidden_states
    if not student or not teacher:
        raise UserError("hidden_distill_weight > 0 needs a model whose outputs have hidden_states "
                        "(output_hidden_states=True)")
    return F.mse_loss(student[-1][:, 0].float(), teacher[-1][:, 0].detach().float())
