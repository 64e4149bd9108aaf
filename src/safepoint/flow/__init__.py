"""Flows: a linear pipeline of heavy steps that restarts at the step that failed."""

from safepoint.errors import StepMismatch
from safepoint.flow.engine import Flow
from safepoint.flow.record import StepChangedWarning, StepStatus
from safepoint.flow.stepdata import StepData

__all__ = ["Flow", "StepChangedWarning", "StepData", "StepMismatch", "StepStatus"]
