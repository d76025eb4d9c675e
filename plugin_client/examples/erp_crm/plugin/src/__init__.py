"""The erp_crm plugin package (entry point `src.main:Plugin`)."""
