"""Knowledge distillation: a frozen teacher (``teacher``), students on rank subgroups
(``ranks``); the training task is ``dinosys.train.tasks.distill``."""
