"""results.json (the versioned build record, gates) and its renderings: report.md and report.html."""
