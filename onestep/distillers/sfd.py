"""Score Forgetting Distillation (Chen, Zhang & Zhou, ICLR 2025): distill with SiD and unlearn concepts in one pass.

Per step, with c_r a remaining concept, c_f a forgotten one and c_o its override ("safe") concept:
  critic:    lambda_psi_r DSM(G(z|c_r), c_r) + lambda_psi_f DSM(G(z|c_f), c_f)
  generator: lambda_th_r SiD(teacher at c_r, fake at c_r) + lambda_th_f SiD(teacher at c_o, fake at c_f)
The generator learns to answer c_f with what the teacher draws for c_o, while the fake score keeps tracking what
the generator does at c_f. Remaining concepts get a full batch, forgotten ones `forget_batch_fraction` of one (a full
batch each in the official code).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from onestep.data.conditions import ConditionSampler
from onestep.distillers.sid import SiD, SiDOptions, sid_loss
from onestep.models.conditioning import Condition
from onestep.training.updates import LossOutput


OVERRIDES = ("fixed", "random", "classifier")


@dataclass
class SFDOptions(SiDOptions):
    """`options:` of an sfd config (class-conditional defaults; use weight 1.0 everywhere for prompts)."""

    forget: list[int] = field(default_factory=lambda: [0])  # class labels to forget
    override: str = "random"  # fixed (override_class) | random (another remaining class) | classifier (pseudo-label)
    override_class: int | None = None  # the class of override: fixed
    # what the classifier labels: fake_x0 = the fake score's x0-prediction at the SiD loss's x_t, per t (the official
    # code), sample = the generator's sample itself
    classifier_input: str = "fake_x0"
    forget_prompts: list[str] = field(default_factory=list)  # text teachers: prompts to forget ...
    prompt_rewrites: dict[str, str] = field(default_factory=dict)  # ... and regex -> replacement giving c_o
    critic_remain_weight: float = 1.0  # critic loss weights on the remaining ...
    critic_forget_weight: float = 0.01  # ... and forgotten conditions
    generator_remain_weight: float = 1.0  # generator loss weights, likewise
    generator_forget_weight: float = 0.01  # (forgotten conditions)
    # the forget batch as a share of data.batch_size: 1.0 = a full batch as in the official code; a forgotten class
    # is one concept of many, and a smaller batch leaves more of a fixed budget to the remaining ones
    forget_batch_fraction: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.forget_batch_fraction <= 1:
            raise ValueError(f"forget_batch_fraction must be in (0, 1], got {self.forget_batch_fraction}")
        if self.override not in OVERRIDES:
            raise ValueError(f"override must be one of {', '.join(OVERRIDES)}, got {self.override!r}")
        if self.classifier_input not in ("fake_x0", "sample"):
            raise ValueError(f"classifier_input must be fake_x0 or sample, got {self.classifier_input!r}")
        if self.override == "fixed" and self.override_class is None and not self.forget_prompts:
            raise ValueError("override fixed needs override_class")
        for pattern in self.prompt_rewrites:
            re.compile(pattern)
        if self.regression.weight > 0:  # its pairs would pull the student back to the teacher's forgotten concept
            raise ValueError("sfd does not take options.regression: the teacher's pairs include the forgotten concept")


class SFD(SiD):
    """SiD whose forget batch is supervised by the teacher at the override concept."""

    options_cls = SFDOptions

    def __init__(self, teacher, options: SFDOptions, conditions=None, judge=None, batch_size: int = 64,
                 classifier: Callable[[torch.Tensor], torch.Tensor] | None = None, **unused):
        super().__init__(teacher, options, conditions, judge, batch_size)
        self.classifier = classifier
        self.forget_batch_size = max(1, round(options.forget_batch_fraction * batch_size))
        if options.forget_prompts:
            self._init_prompts(options)
        else:
            self._init_classes(options)

    def _init_classes(self, o: SFDOptions) -> None:
        num = self.teacher.num_classes
        if num is None:
            raise ValueError("class forgetting needs a class-conditional teacher (or give forget_prompts)")
        bad = [c for c in [*o.forget, o.override_class] if c is not None and not 0 <= c < num]
        if bad:
            raise ValueError(f"class {bad[0]} does not exist: the teacher has classes 0..{num - 1}")
        if o.override_class in o.forget:
            raise ValueError(f"override_class {o.override_class} is itself forgotten")
        if o.override == "classifier" and self.classifier is None:
            raise ValueError("override classifier needs a classifier for pseudo-labels")
        self.remain = ConditionSampler(classes=[c for c in range(num) if c not in o.forget])
        self.forget = ConditionSampler(classes=o.forget)

    def _init_prompts(self, o: SFDOptions) -> None:
        prompts = self.conditions.prompts or []
        remain = [p for p in prompts if p not in set(o.forget_prompts)]
        if not remain:
            raise ValueError("no remaining prompts: every prompt is forgotten")
        encode = self.teacher.encode_prompts
        self.remain = ConditionSampler(prompts=remain, encode=encode)
        self.forget = ConditionSampler(prompts=o.forget_prompts, encode=encode)
        self.override_prompts = [self.rewrite(p) for p in o.forget_prompts]

    def rewrite(self, prompt: str) -> str:
        for pattern, replacement in self.options.prompt_rewrites.items():
            prompt = re.sub(pattern, replacement, prompt)
        return prompt

    # --- concepts ----------------------------------------------------------------------------------------------
    def override_condition(self, forget_index: torch.Tensor, forget: Condition, x0_fake: torch.Tensor) -> Condition:
        """c_o for each forget sample: a fixed class, a random remaining class, the classifier's label of x0_fake
        (never a forgotten class), or the rewritten prompt."""
        o = self.options
        if o.forget_prompts:
            return self.forget.encode([self.override_prompts[i] for i in forget_index.tolist()])
        labels = forget.class_labels
        if o.override == "fixed":
            return Condition(class_labels=torch.full_like(labels, o.override_class))
        if o.override == "random":
            return self.remain(labels.shape[0], labels.device)
        with torch.no_grad():
            logits = self.classifier(self.teacher.decode(x0_fake)).float().clone()
            logits[:, o.forget] = -torch.inf  # never the forgotten class itself
        return Condition(class_labels=logits.argmax(dim=1).to(labels.device))

    # --- losses ------------------------------------------------------------------------------------------------
    def generator_loss(self, generator) -> LossOutput:
        o = self.options
        x_r, _, c_r = self.draw(generator, self.remain)
        mu_real, mu_fake = self.score_pair(x_r, c_r, c_r)
        remain = sid_loss(x_r, mu_real, mu_fake, o.alpha).mean()
        x_f, index, c_f = self.draw(generator, self.forget, batch_size=self.forget_batch_size)
        if o.override == "classifier" and o.classifier_input == "fake_x0":
            c_o = functools.partial(self.override_condition, index, c_f)  # labels sg(mu_fake) at the loss's x_t
        else:
            c_o = self.override_condition(index, c_f, x_f.detach())
        mu_real, mu_fake = self.score_pair(x_f, c_o, c_f)  # teacher at the override, fake score at the forget concept
        forget = sid_loss(x_f, mu_real, mu_fake, o.alpha).mean()
        loss = o.generator_remain_weight * remain + o.generator_forget_weight * forget
        return LossOutput(loss, {"remain": remain.item(), "forget": forget.item()})

    def critic_loss(self, fake) -> LossOutput:
        o = self.options
        with torch.no_grad():
            x_r, _, c_r = self.draw(self.generator, self.remain)
            x_f, _, c_f = self.draw(self.generator, self.forget, batch_size=self.forget_batch_size)
        remain = self.critic_denoising_loss(fake, x_r, c_r).mean()
        forget = self.critic_denoising_loss(fake, x_f, c_f).mean()
        loss = o.critic_remain_weight * remain + o.critic_forget_weight * forget
        return LossOutput(loss, {"remain": remain.item(), "forget": forget.item()})
