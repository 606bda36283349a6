"""The CellCMS data map: its models, its loader with file/line diagnostics, and the SQL that follows it."""

from privacy_ops.datamap.loader import DataMapError, Problem, check_against_database, load_datamap

__all__ = ["DataMapError", "Problem", "check_against_database", "load_datamap"]
