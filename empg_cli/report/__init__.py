"""`empg report`: one self-contained HTML file to audit credit assignment trajectory by trajectory."""

from .build import render_report, report_document, write_report

__all__ = ["render_report", "report_document", "write_report"]
