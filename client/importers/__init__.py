"""Importers: one reader per file format, all validation up front, then one aligned Cohort.

``import_cohort(spec)`` reads every file a cohort spec names, checks all of it and either
returns a :class:`common.cohort.Cohort` or raises :class:`CohortImportError` listing every
:class:`Problem` (file, line or patient, column, and what to do).
"""

from client.importers.assemble import import_cohort
from client.importers.problems import CohortImportError, Problem

__all__ = ["CohortImportError", "Problem", "import_cohort"]
