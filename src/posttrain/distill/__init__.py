"""On-policy distillation: frozen expert teachers that score the student's sampled tokens.

The estimator (``reverse_kl``) lives with the other advantage estimators in
``posttrain.algorithms.distill``; this package holds the teacher role and the routing of rows.
"""

from posttrain.distill.teachers import TeacherError, Teachers, make_router

__all__ = ["TeacherError", "Teachers", "make_router"]
