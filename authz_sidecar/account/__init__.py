"""The account page (``/account``): server-rendered HTML for people with an API key
(docs/decisions/0037-account-page.md, docs/account.md)."""
