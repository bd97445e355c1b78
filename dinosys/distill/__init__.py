"""Knowledge distillation: a frozen teacher (``teacher``), students on rank subgroups
(``ranks``), one student's objective (``student``), the training task (``task``) and
``dinosys distill`` (``run``)."""
