-- Only allow-listed request headers reach the LLM backend (docs/decisions/0003-upstream-headers.md).
--
-- Why: the backend credential is shared by every tenant, and a backend acts on more than the
-- body: x-api-key or api-key authenticate too, openai-organization / openai-project choose which
-- of the gateway's accounts pays, cookies and our own x-billingproxy-* names mean something to
-- somebody. Envoy has no "keep only these headers" option, so this filter, last before the
-- router on the /v1/ route, removes every header not named below. It runs after ext_authz, so
-- the credential header the Check set is the one kept; the client's own key, under whatever
-- name, is removed. After it the router sets only host and accept-encoding (envoy_config.py).
--
-- envoy_config.py renders the two tables (the lines marked "rendered") from Settings: the
-- built-in names (envoy_config.UPSTREAM_HEADERS), BILLINGPROXY_UPSTREAM_HEADERS, and the
-- credential's header when a backend credential is configured. Pseudo-headers (:path, :method,
-- :authority, :scheme) are Envoy's and always stay.

local ALLOWED = {}  -- rendered: exact names
local ALLOWED_PREFIXES = {}  -- rendered: prefixes

local COLON = string.byte(":")

local function allowed(name)
  if ALLOWED[name] or string.byte(name, 1) == COLON then
    return true
  end
  for _, prefix in ipairs(ALLOWED_PREFIXES) do
    if string.sub(name, 1, #prefix) == prefix then
      return true
    end
  end
  return false
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  -- Collected first: the header map must not change while it is iterated.
  local refused = {}
  for name, _ in pairs(headers) do
    if not allowed(name) then
      refused[#refused + 1] = name
    end
  end
  for _, name in ipairs(refused) do
    headers:remove(name)
  end
end
