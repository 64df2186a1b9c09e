"""A mean-opinion-score study of look search results: prepare tasks, serve the annotation
page, aggregate the scores (see README "Quality: offline metrics and the MOS page")."""
