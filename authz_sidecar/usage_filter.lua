-- BillingProxy usage filter: Envoy's Lua HTTP filter on the /v1/ routes.
--
-- Why it exists: a request's exact cost needs the token counts the LLM backend reports in its
-- answer, and that answer may stream for minutes. This filter reads them as the body passes by
-- (bodyChunks(), never body(), so Envoy never buffers a response) and leaves them in dynamic
-- metadata; the gRPC access log then carries them, together with ext_authz's metadata, to the
-- sidecar, which settles the request's hold.
--
-- Response side: for 2xx JSON or SSE answers, keep the last TAIL_BYTES of the stream and scan
-- tail .. chunk for "prompt_tokens" (or the Responses API's "input_tokens"), "completion_tokens"
-- (or "output_tokens") and "cached_tokens"; the last value seen wins (a streamed answer's final
-- chunk or response.completed event carries the totals). The pattern ends with the key's
-- closing quote, so "completion_tokens_details" never counts as completion_tokens. An unescaped
-- quoted key cannot occur inside a JSON string, so text the model writes cannot forge a count.
-- Result, namespace "billingproxy.usage":
--   prompt_tokens, completion_tokens, cached_tokens  numbers (0 when absent)
--   usage_seen                                       true only when prompt_tokens was found
-- The values are set whenever a count is found, so a stream the client abandons still logs what
-- was seen. An answer with no count leaves the namespace empty, which the access log reads as
-- "no usage seen" (setting zeros up front cost four metadata writes per request for nothing).
--
-- Request side: OpenAI-compatible backends report usage in a stream only when asked with
-- "stream_options": {"include_usage": true}. For POST /v1/chat/completions and /v1/completions
-- with "stream": true the filter adds that option (or turns it on) so every stream is billed
-- from the backend's own count. ext_authz has already buffered the request body, so body() costs
-- no extra wait here; setBytes() also rewrites content-length.

local NAMESPACE = "billingproxy.usage"
local TAIL_BYTES = 256

-- {the count it fills, the pattern}. Chat completions and embeddings say prompt_tokens /
-- completion_tokens; the Responses API (/v1/responses) says input_tokens / output_tokens for the
-- same two counts. Both put cached_tokens in a details object.
local USAGE_PATTERNS = {
  {"prompt_tokens", '"prompt_tokens"%s*:%s*(%d+)'},
  {"prompt_tokens", '"input_tokens"%s*:%s*(%d+)'},
  {"completion_tokens", '"completion_tokens"%s*:%s*(%d+)'},
  {"completion_tokens", '"output_tokens"%s*:%s*(%d+)'},
  {"cached_tokens", '"cached_tokens"%s*:%s*(%d+)'},
}

-- Only these endpoints accept stream_options; /v1/responses, for one, rejects it.
local USAGE_OPTION_PATHS = {
  ["/v1/chat/completions"] = true,
  ["/v1/completions"] = true,
}

-- ---------------------------------------------------------------------------------------------
-- Response: token usage
-- ---------------------------------------------------------------------------------------------

local function publish(handle, usage, seen)
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set(NAMESPACE, "prompt_tokens", usage.prompt_tokens)
  metadata:set(NAMESPACE, "completion_tokens", usage.completion_tokens)
  metadata:set(NAMESPACE, "cached_tokens", usage.cached_tokens)
  metadata:set(NAMESPACE, "usage_seen", seen)
end

-- Updates usage from every match in window; returns true when anything matched.
local function scan(window, usage, seen)
  -- Most chunks of a long answer hold no usage at all: one plain search skips them cheaply.
  if not string.find(window, '_tokens"', 1, true) then
    return false, seen
  end
  local found = false
  for _, rule in ipairs(USAGE_PATTERNS) do
    local key, pattern = rule[1], rule[2]
    local last = nil
    for digits in string.gmatch(window, pattern) do
      last = digits
    end
    if last ~= nil then
      usage[key] = tonumber(last)
      found = true
      if key == "prompt_tokens" then
        seen = true
      end
    end
  end
  return found, seen
end

local function is_usage_bearing(headers)
  local status = tonumber(headers:get(":status") or "")
  if status == nil or status < 200 or status > 299 then
    return false
  end
  local content_type = string.lower(headers:get("content-type") or "")
  if not (string.find(content_type, "json", 1, true)
          or string.find(content_type, "event-stream", 1, true)) then
    return false
  end
  return true
end

function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  if not is_usage_bearing(headers) then
    return
  end
  local encoding = string.lower(headers:get("content-encoding") or "identity")
  if encoding ~= "identity" then
    -- The route asks for identity; a backend that compresses anyway cannot be read here.
    response_handle:logWarn("billingproxy: usage unreadable, content-encoding " .. encoding)
    return
  end

  local usage = {prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0}
  local seen = false
  local tail = ""
  for chunk in response_handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      -- The tail re-scans the end of the previous chunk, so a key or a number cut in two by a
      -- chunk boundary is still read whole; re-reading an earlier match is harmless.
      local window = tail .. chunk:getBytes(0, size)
      local found
      found, seen = scan(window, usage, seen)
      if found then
        publish(response_handle, usage, seen)
      end
      if #window > TAIL_BYTES then
        tail = string.sub(window, -TAIL_BYTES)
      else
        tail = window
      end
    end
  end
end

-- ---------------------------------------------------------------------------------------------
-- Request: ask streams for usage
--
-- A small JSON scanner, enough to find the top-level "stream" and "stream_options" members: a
-- plain text search would also hit a "stream" key nested in tool schemas or metadata, and adding
-- stream_options to a request that is not streamed makes OpenAI answer 400.
-- ---------------------------------------------------------------------------------------------

local function skip_ws(s, i)
  return string.match(s, "^[ \t\r\n]*()", i)
end

-- Index just past the JSON string that starts at s[i] == '"', or nil.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = string.find(s, '["\\]', j)
    if k == nil then
      return nil
    end
    if string.byte(s, k) == 34 then
      return k + 1
    end
    j = k + 2
  end
end

-- Index just past the JSON value that starts at s[i], or nil when it is malformed.
local function skip_value(s, i)
  local c = string.sub(s, i, i)
  if c == '"' then
    return skip_string(s, i)
  end
  if c == "{" or c == "[" then
    local depth = 0
    local j = i
    while true do
      local k = string.find(s, '[{}%[%]"]', j)
      if k == nil then
        return nil
      end
      local ck = string.sub(s, k, k)
      if ck == '"' then
        j = skip_string(s, k)
        if j == nil then
          return nil
        end
      else
        if ck == "{" or ck == "[" then
          depth = depth + 1
        else
          depth = depth - 1
        end
        j = k + 1
        if depth == 0 then
          return j
        end
      end
    end
  end
  local j = string.find(s, "[,}%] \t\r\n]", i)
  if j == nil or j == i then
    return nil
  end
  return j
end

-- A key as the backend's JSON parser reads it: "str\u0065am" is "stream" too.
local function decode_name(raw)
  if not string.find(raw, "\\", 1, true) then
    return raw
  end
  local decoded = string.gsub(raw, "\\u(%x%x%x%x)", function(hex)
    local code = tonumber(hex, 16)
    if code < 128 then
      return string.char(code)
    end
  end)
  decoded = string.gsub(decoded, '\\(["\\/])', "%1")
  return decoded
end

-- Members of the JSON object at s[i] == '{' as {name, from, to} (value is s[from, to)), or nil.
local function object_members(s, i)
  if string.sub(s, i, i) ~= "{" then
    return nil
  end
  local members = {}
  local j = skip_ws(s, i + 1)
  if string.sub(s, j, j) == "}" then
    return members
  end
  while true do
    if string.sub(s, j, j) ~= '"' then
      return nil
    end
    local name_end = skip_string(s, j)
    if name_end == nil then
      return nil
    end
    local name = decode_name(string.sub(s, j + 1, name_end - 2))
    j = skip_ws(s, name_end)
    if string.sub(s, j, j) ~= ":" then
      return nil
    end
    local from = skip_ws(s, j + 1)
    local to = skip_value(s, from)
    if to == nil then
      return nil
    end
    members[#members + 1] = {name = name, from = from, to = to}
    j = skip_ws(s, to)
    local c = string.sub(s, j, j)
    if c == "}" then
      return members
    end
    if c ~= "," then
      return nil
    end
    j = skip_ws(s, j + 1)
  end
end

-- The last member of that name, as JSON parsers keep the last of duplicate keys.
local function member(members, name)
  local found = nil
  for _, m in ipairs(members) do
    if m.name == name then
      found = m
    end
  end
  return found
end

local function splice(s, from, to, text)
  return string.sub(s, 1, from - 1) .. text .. string.sub(s, to)
end

-- The body with stream_options.include_usage turned on, or nil when it needs no change.
local function with_usage_requested(body)
  local start = skip_ws(body, 1)
  local root = object_members(body, start)
  if root == nil then
    return nil
  end
  local stream = member(root, "stream")
  if stream == nil or string.sub(body, stream.from, stream.to - 1) ~= "true" then
    return nil
  end
  local options = member(root, "stream_options")
  if options == nil then
    return splice(body, start + 1, start + 1, '"stream_options":{"include_usage":true},')
  end
  if string.sub(body, options.from, options.to - 1) == "null" then
    return splice(body, options.from, options.to, '{"include_usage":true}')
  end
  local inner = object_members(body, options.from)
  if inner == nil then
    -- Not an object: the backend rejects the request itself.
    return nil
  end
  local include_usage = member(inner, "include_usage")
  if include_usage == nil then
    local separator = ""
    if #inner > 0 then
      separator = ","
    end
    return splice(body, options.from + 1, options.from + 1, '"include_usage":true' .. separator)
  end
  if string.sub(body, include_usage.from, include_usage.to - 1) == "true" then
    return nil
  end
  return splice(body, include_usage.from, include_usage.to, "true")
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  if headers:get(":method") ~= "POST" then
    return
  end
  local path = string.match(headers:get(":path") or "", "^[^?]*")
  if not USAGE_OPTION_PATHS[path] then
    return
  end
  local content_type = string.lower(headers:get("content-type") or "")
  if not string.find(content_type, "application/json", 1, true) then
    return
  end
  local body = request_handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  local bytes = body:getBytes(0, body:length())
  -- Most requests are not streamed. Without the word "stream" anywhere, nor a \u escape that
  -- could spell it in a key, the body has no "stream" member: skip the walk.
  if not string.find(bytes, "stream", 1, true) and not string.find(bytes, "\\u", 1, true) then
    return
  end
  local rewritten = with_usage_requested(bytes)
  if rewritten ~= nil then
    body:setBytes(rewritten)
  end
end
