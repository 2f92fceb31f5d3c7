"""Results as text, tables, figures, HTML and the report directory; nothing here measures anything."""
