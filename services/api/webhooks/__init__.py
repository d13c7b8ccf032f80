"""Webhook endpoints: subscriptions to tier and risk-band changes, and their delivery log."""
