"""Portfolio KPIs: the whole book of accounts, or one manager's."""
