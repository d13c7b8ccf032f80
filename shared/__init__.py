"""Domain package shared by the API and the scorer: settings, enums, schemas and models."""
