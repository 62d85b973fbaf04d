-- BillingProxy usage filter: Envoy's Lua HTTP filter on the /v1/ routes.
--
-- Why it exists: a request's exact cost needs the usage the LLM backend reports in its answer,
-- and that answer may stream for minutes. This filter finds the provider's final usage object as
-- the body passes by (bodyChunks(), never body(), so Envoy never buffers a response) and leaves
-- its raw JSON text in dynamic metadata; the gRPC access log carries it, with ext_authz's
-- metadata, to the sidecar, which parses it (billing/usage.py) and settles the request's hold.
--
-- Why structurally (decision records 0001 and 0007): an answer may echo the client's own input
-- (the Responses API returns the request's instructions, tools and metadata; a model repeats what
-- it is told). Usage is read only from its documented place, found by an incremental JSON
-- scanner: strings are skipped whole (escapes and chunk boundaries included), object keys are
-- tracked by depth, arrays never match, and only the raw text of the value at the path is kept
-- (at most CAPTURE_MAX bytes). Client text lives inside JSON strings or below the top level of
-- objects, so it can neither reach the path nor end an event early.
--
-- The Check decides, not the path: ext_authz's metadata (namespace envoy.filters.http.ext_authz)
-- carries x-billingproxy-format (billing.usage.Format) and, for an OpenAI chat/completions
-- stream, x-billingproxy-stream-usage = "1". No format: nothing is read.
--
-- Per format, where the final usage is (JSON answer: the top-level "usage"; finished when the
-- top-level object closed and only whitespace follows):
--   openai_chat         SSE: a data: chunk whose top-level "usage" is an object; finished at
--                       "data: [DONE]" after it.
--   openai_responses    SSE: "response.usage" of the event whose data "type" is
--                       response.completed or response.incomplete; finished there.
--   openai_embeddings   JSON only.
--   anthropic_messages  SSE: message_start's "message.usage" (usage_start), message_delta's
--                       "usage"; finished at message_stop after both.
-- SSE is framed per the spec: lines end in \n, \r\n or \r; data: lines of an event are joined
-- with \n; a blank line ends the event.
--
-- Result, namespace "billingproxy.usage":
--   usage        string  raw JSON text of the final usage object ("" when it was too large)
--   usage_start  string  Anthropic's message_start usage (streams only)
--   finished     bool    true only once the terminal event was seen
-- usage and usage_start are set as they are seen, so a hang-up still logs them; finished is set
-- only at the terminal event. An unfinished answer is charged its hold (the worst case).
--
-- Request side: an OpenAI chat/completions stream reports usage only when asked with
-- "stream_options": {"include_usage": true}. When the Check says so (stream-usage "1"), the
-- filter turns that on; a body it cannot rewrite is answered 400 here rather than forwarded as a
-- stream that would not report usage. ext_authz has already buffered the request body, so body()
-- costs no extra wait; setBytes() also rewrites content-length.

-- The words shared with the sidecar (authz_sidecar/contract.py): envoy_config.py renders each
-- line marked "rendered: contract" with the value of its name there, so none is copied here.
local AUTHZ_NAMESPACE = nil  -- rendered: contract
local USAGE_NAMESPACE = nil  -- rendered: contract
local FORMAT_KEY = nil  -- rendered: contract
local STREAM_USAGE_KEY = nil  -- rendered: contract
local USAGE = nil  -- rendered: contract
local USAGE_START = nil  -- rendered: contract
local FINISHED = nil  -- rendered: contract
local CAPTURE_MAX = 16384  -- a usage object is a few hundred bytes; beyond this it is unreadable
local KEY_MAX = 256        -- longer object keys are kept as "no name we look for"
local FIELD_MAX = 64       -- an SSE field name longer than this is not data: nor event:
local DEPTH_MAX = 512

local find, sub, byte, match, char, concat = string.find, string.sub, string.byte, string.match,
  string.char, table.concat

-- What to capture, as a tree of object keys from the document's root: a string leaf names the
-- capture, a table descends into that member's object.
local JSON_PATHS = {usage = USAGE}
local SSE_PATHS = {
  openai_chat = {usage = "usage"},
  openai_responses = {type = "type", response = {usage = "usage"}},
  anthropic_messages = {type = "type", usage = "usage", message = {usage = "usage_start"}},
}

-- A key as a JSON parser reads it ("us\u0061ge" is "usage"); false for names we never look for
-- (non-ASCII escapes, control escapes).
local function decode_name(raw)
  if not find(raw, "\\", 1, true) then
    return raw
  end
  local out, i = {}, 1
  while true do
    local k = find(raw, "\\", i, true)
    if k == nil then
      out[#out + 1] = sub(raw, i)
      return concat(out)
    end
    out[#out + 1] = sub(raw, i, k - 1)
    local c = sub(raw, k + 1, k + 1)
    if c == "u" then
      local hex = match(raw, "^%x%x%x%x", k + 2)
      local code = hex and tonumber(hex, 16)
      if code == nil or code >= 128 then
        return false
      end
      out[#out + 1] = char(code)
      i = k + 6
    elseif c == '"' or c == "\\" or c == "/" then
      out[#out + 1] = c
      i = k + 2
    else
      return false
    end
  end
end

local function trim(text)
  local from = find(text, "[^ \t\r\n]")
  if from == nil then
    return ""
  end
  return sub(text, from, find(text, "[ \t\r\n]*$") - 1)
end

-- ---------------------------------------------------------------------------------------------
-- An incremental JSON scanner over one document fed in pieces. It tracks structure only (what
-- a JSON parser needs to know where a member starts and ends); values are never interpreted
-- here. get(name) is the captured raw text (string), false when it exceeded CAPTURE_MAX, or nil.
-- on_capture(name, text) is called as each capture ends.
-- ---------------------------------------------------------------------------------------------

local function new_scanner(paths, on_capture)
  local scanner = {}
  local depth, mode, esc            -- mode: 0 structure, 1 a string skipped, 2 a key kept
  local started, closed, trailing, broken
  local is_object, nodes, keys, expecting_key, value_nodes = {}, {}, {}, {}, {}
  local key_raw, key_long
  local cap_name, cap_depth, cap_parts, cap_size, cap_over
  local captures

  function scanner.reset()
    depth, mode, esc = 0, 0, false
    started, closed, trailing, broken = false, false, false, false
    key_raw, key_long = "", false
    cap_name, cap_depth, cap_parts, cap_size, cap_over = nil, 0, nil, 0, false
    captures = {}
  end

  function scanner.get(name)
    return captures[name]
  end

  -- The document was one object, closed, with nothing but whitespace after it.
  function scanner.complete()
    return closed and not trailing and not broken
  end

  -- Nothing more can change the result (malformed, or text after the document).
  function scanner.dead()
    return broken or trailing
  end

  local function end_capture(s, from, to)
    local text = false
    if not cap_over and cap_size + (to - from + 1) <= CAPTURE_MAX then
      cap_parts[#cap_parts + 1] = sub(s, from, to)
      text = trim(concat(cap_parts))
    end
    local name = cap_name
    captures[name] = text
    cap_name, cap_parts, cap_size, cap_over = nil, nil, 0, false
    if on_capture ~= nil then
      on_capture(name, text)
    end
  end

  function scanner.feed(s)
    if broken or trailing then
      return
    end
    local n = #s
    local i = 1
    local cap_from, key_from = 1, 1
    if esc then
      -- The piece before ended in a backslash inside a string: this byte is the escaped one.
      esc = false
      i = 2
    end
    while i <= n do
      if mode ~= 0 then
        local k = find(s, '["\\]', i)
        if k == nil then
          break
        end
        if byte(s, k) == 92 then
          if k == n then
            esc = true
          end
          i = k + 2
        else
          if mode == 2 then
            if key_long or #key_raw + (k - key_from) > KEY_MAX then
              keys[depth] = false
            else
              keys[depth] = decode_name(key_raw .. sub(s, key_from, k - 1))
            end
            key_raw, key_long = "", false
          end
          mode = 0
          i = k + 1
        end
      elseif depth == 0 then
        local k = find(s, "[^ \t\r\n]", i)
        if k == nil then
          break
        end
        if started then
          trailing = true
          break
        end
        if byte(s, k) ~= 123 then
          broken = true
          break
        end
        started = true
        depth = 1
        is_object[1], nodes[1], keys[1], expecting_key[1], value_nodes[1] = true, paths, false, true, false
        i = k + 1
      else
        local k = find(s, '[{}%[%]",:]', i)
        if k == nil then
          break
        end
        local c = byte(s, k)
        i = k + 1
        if c == 34 then  -- "
          if expecting_key[depth] and nodes[depth] then
            mode = 2
            key_from = i
            key_raw, key_long = "", false
          else
            mode = 1
          end
        elseif c == 58 then  -- :
          if is_object[depth] then
            expecting_key[depth] = false
            local node = nodes[depth]
            local child = node and keys[depth] and node[keys[depth]]
            if type(child) == "string" then
              if cap_name == nil then
                cap_name, cap_depth, cap_parts, cap_size, cap_over = child, depth, {}, 0, false
                cap_from = i
              end
              value_nodes[depth] = false
            else
              value_nodes[depth] = child or false
            end
          end
        elseif c == 123 or c == 91 then  -- { [
          if depth >= DEPTH_MAX then
            broken = true
            break
          end
          local node = false
          if c == 123 and is_object[depth] and not expecting_key[depth] then
            node = value_nodes[depth]
          end
          depth = depth + 1
          is_object[depth], nodes[depth], keys[depth], value_nodes[depth] = c == 123, node, false, false
          expecting_key[depth] = c == 123
        elseif c == 125 or c == 93 then  -- } ]
          if is_object[depth] ~= (c == 125) then
            broken = true
            break
          end
          if cap_name ~= nil and cap_depth == depth then
            end_capture(s, cap_from, k - 1)
          end
          depth = depth - 1
          if depth == 0 then
            closed = true
          end
        else  -- ,
          if cap_name ~= nil and cap_depth == depth then
            end_capture(s, cap_from, k - 1)
          end
          if is_object[depth] then
            expecting_key[depth], keys[depth], value_nodes[depth] = true, false, false
          end
        end
      end
    end
    -- The piece ends inside a key or a capture: keep what it holds of them.
    if mode == 2 and not key_long then
      if #key_raw + (n - key_from + 1) > KEY_MAX then
        key_long, key_raw = true, ""
      else
        key_raw = key_raw .. sub(s, key_from, n)
      end
    end
    if cap_name ~= nil and not cap_over then
      if cap_size + (n - cap_from + 1) > CAPTURE_MAX then
        cap_over, cap_parts = true, nil
      else
        cap_parts[#cap_parts + 1] = sub(s, cap_from, n)
        cap_size = cap_size + (n - cap_from + 1)
      end
    end
  end

  scanner.reset()
  return scanner
end

-- ---------------------------------------------------------------------------------------------
-- Server-sent events: frames lines, feeds each event's data to a scanner, and calls
-- on_event(done) at each blank line that ends an event with data (done: the data is "[DONE]").
-- feed() returns true once on_event asked to stop (the terminal event was seen).
--
-- Most events of a stream are one token each and cannot matter (a chat chunk with "usage": null,
-- a text delta). An event's data up to EVENT_HELD bytes is held until the event ends and scanned
-- only when relevant(data) finds the text its usage or terminal type must contain (an unescaped
-- key or type name: a provider that escaped one would only be charged its hold); larger events
-- are scanned as they pass. Measured: this spares ~4 µs of Envoy CPU per streamed token.
-- ---------------------------------------------------------------------------------------------

local EVENT_HELD = 8192

local function new_sse(scanner, relevant, on_event)
  local sse = {}
  local line = "start"   -- "start": reading a field name; "data": a data: value; "skip": other
  local field = ""
  local cr = false       -- the last piece ended in \r: a \n first in this one ends the same line
  local space = false    -- after "data:", one leading space is dropped (maybe first in this piece)
  local has_data, data_len, head = false, 0, ""
  local held, held_len = {}, 0   -- the event's data so far, while at most EVENT_HELD bytes
  local streaming = false        -- the event outgrew EVENT_HELD: its data goes to the scanner
  local scanned = false          -- the scanner has seen this event's data
  local stopped = false

  local function data(piece)
    data_len = data_len + #piece
    if #head < 8 then
      head = head .. sub(piece, 1, 8 - #head)
    end
    if not streaming then
      if held_len + #piece <= EVENT_HELD then
        held[#held + 1] = piece
        held_len = held_len + #piece
        return
      end
      streaming, scanned = true, true
      for _, earlier in ipairs(held) do
        scanner.feed(earlier)
      end
      held, held_len = {}, 0
    end
    scanner.feed(piece)
  end

  local function begin_data_line()
    if has_data then
      data("\n")
    end
    has_data = true
  end

  local function dispatch()
    if has_data then
      if not streaming and held_len > 0 then
        local text = held[1]
        if #held > 1 then
          text = concat(held)
        end
        if relevant(text) then
          scanned = true
          scanner.feed(text)
        end
      end
      stopped = on_event(data_len == 6 and head == "[DONE]") == true
    end
    has_data, data_len, head = false, 0, ""
    if held_len > 0 then
      held, held_len = {}, 0
    end
    if scanned then
      scanner.reset()
    end
    streaming, scanned = false, false
  end

  function sse.feed(s)
    local n = #s
    local i = 1
    if cr then
      cr = false
      if byte(s, 1) == 10 then
        i = 2
      end
    end
    local function line_end(k)
      if byte(s, k) == 13 then
        if k == n then
          cr = true
        elseif byte(s, k + 1) == 10 then
          return k + 2
        end
      end
      return k + 1
    end
    while i <= n and not stopped do
      if line == "start" then
        local k = find(s, "[:\r\n]", i)
        if k == nil then
          field = field .. sub(s, i, n)
          if #field > FIELD_MAX then
            line, field = "skip", ""
          end
          break
        end
        local name = field .. sub(s, i, k - 1)
        field = ""
        if byte(s, k) == 58 then  -- the field name ends at its colon
          if name == "data" then
            begin_data_line()
            line, space = "data", true
          else
            line = "skip"  -- event:, id:, retry:, comments (empty name): nothing billing needs
          end
          i = k + 1
        else  -- a line with no colon
          if name == "" then
            dispatch()
          elseif name == "data" then
            begin_data_line()
          end
          i = line_end(k)
        end
      elseif line == "data" then
        if space then
          space = false
          if byte(s, i) == 32 then
            i = i + 1
          end
        else
          local k = find(s, "[\r\n]", i)
          local to = (k or (n + 1)) - 1
          if to >= i then
            data(sub(s, i, to))
          end
          if k == nil then
            break
          end
          line = "start"
          i = line_end(k)
        end
      else
        local k = find(s, "[\r\n]", i)
        if k == nil then
          break
        end
        line = "start"
        i = line_end(k)
      end
    end
    return stopped
  end

  return sse
end

-- ---------------------------------------------------------------------------------------------
-- Response: the final usage
-- ---------------------------------------------------------------------------------------------

local function usage_format(handle)
  local authz = handle:streamInfo():dynamicMetadata():get(AUTHZ_NAMESPACE)
  if authz == nil then
    return nil
  end
  return authz[FORMAT_KEY], authz[STREAM_USAGE_KEY]
end

-- Whether an event's data can hold what a stream format reads (see new_sse).
local SSE_RELEVANT = {
  openai_chat = function(text)
    return find(text, '"usage"%s*:%s*{') ~= nil
  end,
  openai_responses = function(text)
    return find(text, '"response.completed"', 1, true) ~= nil
      or find(text, '"response.incomplete"', 1, true) ~= nil
  end,
  anthropic_messages = function(text)
    return find(text, '"message_', 1, true) ~= nil
  end,
}

-- What each stream format does at the end of an event; returns true at its terminal event.
local SSE_EVENTS = {
  openai_chat = function(scanner, done, state, publish)
    if done then
      if state.usage_seen then
        publish(FINISHED, true)
        return true
      end
      return false
    end
    if scanner.complete() then
      local usage = scanner.get("usage")
      if usage == false then
        state.usage_seen = true
        publish(USAGE, "")
      elseif usage ~= nil and byte(usage, 1) == 123 then
        state.usage_seen = true
        publish(USAGE, usage)
      end
    end
    return false
  end,

  openai_responses = function(scanner, done, state, publish)
    if done or not scanner.complete() then
      return false
    end
    local kind = scanner.get("type")
    if kind == '"response.completed"' or kind == '"response.incomplete"' then
      local usage = scanner.get("usage")
      if usage ~= nil then
        publish(USAGE, usage or "")
      end
      publish(FINISHED, true)
      return true
    end
    return false
  end,

  anthropic_messages = function(scanner, done, state, publish)
    if done or not scanner.complete() then
      return false
    end
    local kind = scanner.get("type")
    if kind == '"message_start"' then
      state.start_seen = true
      publish(USAGE_START, scanner.get("usage_start") or "")
    elseif kind == '"message_delta"' then
      state.delta_seen = true
      publish(USAGE, scanner.get("usage") or "")
    elseif kind == '"message_stop"' and state.start_seen and state.delta_seen then
      publish(FINISHED, true)
      return true
    end
    return false
  end,
}

local function readable(headers)
  local status = tonumber(headers:get(":status") or "")
  if status == nil or status < 200 or status > 299 then
    return nil  -- voided whatever it says
  end
  local content_type = string.lower(headers:get("content-type") or "")
  if find(content_type, "text/event-stream", 1, true) then
    return "sse"
  end
  if find(content_type, "json", 1, true) then
    return "json"
  end
  return nil
end

function envoy_on_response(response_handle)
  local format = usage_format(response_handle)
  if format == nil then
    return
  end
  local headers = response_handle:headers()
  local kind = readable(headers)
  if kind == nil then
    return  -- nothing published: settlement charges the hold
  end
  local encoding = string.lower(headers:get("content-encoding") or "identity")
  if encoding ~= "identity" then
    -- The route asks for identity; a backend that compresses anyway cannot be read here.
    response_handle:logWarn("billingproxy: usage unreadable, content-encoding " .. encoding)
    return
  end

  -- Envoy's handle objects live only until the coroutine yields (at each body chunk): fetched anew.
  local function publish(name, value)
    response_handle:streamInfo():dynamicMetadata():set(USAGE_NAMESPACE, name, value)
  end

  if kind == "json" then
    local scanner = new_scanner(JSON_PATHS, function(name, text)
      publish(name, text or "")
    end)
    for chunk in response_handle:bodyChunks() do
      local size = chunk:length()
      if size > 0 then
        scanner.feed(chunk:getBytes(0, size))
        if scanner.dead() then
          return
        end
      end
    end
    if scanner.complete() then
      publish(FINISHED, true)
    end
    return
  end

  local on_event = SSE_EVENTS[format]
  if on_event == nil then
    return  -- a stream where this format has none (embeddings)
  end
  local scanner = new_scanner(SSE_PATHS[format], nil)
  local state = {}
  local sse = new_sse(scanner, SSE_RELEVANT[format], function(done)
    return on_event(scanner, done, state, publish)
  end)
  for chunk in response_handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 and sse.feed(chunk:getBytes(0, size)) then
      return  -- the terminal event: the rest of the body passes unread
    end
  end
end

-- ---------------------------------------------------------------------------------------------
-- Request: ask streams for usage
--
-- A small JSON reader, enough to find the top-level "stream" and "stream_options" members of the
-- buffered request body (the Check already parsed it as a JSON object).
-- ---------------------------------------------------------------------------------------------

local function skip_ws(s, i)
  return match(s, "^[ \t\r\n]*()", i)
end

-- Index just past the JSON string that starts at s[i] == '"', or nil.
local function skip_string(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\]', j)
    if k == nil then
      return nil
    end
    if byte(s, k) == 34 then
      return k + 1
    end
    j = k + 2
  end
end

-- Index just past the JSON value that starts at s[i], or nil when it is malformed.
local function skip_value(s, i)
  local c = sub(s, i, i)
  if c == '"' then
    return skip_string(s, i)
  end
  if c == "{" or c == "[" then
    local depth = 0
    local j = i
    while true do
      local k = find(s, '[{}%[%]"]', j)
      if k == nil then
        return nil
      end
      local ck = sub(s, k, k)
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
  local j = find(s, "[,}%] \t\r\n]", i)
  if j == nil or j == i then
    return nil
  end
  return j
end

-- Members of the JSON object at s[i] == '{' as {name, from, to} (value is s[from, to)), or nil.
local function object_members(s, i)
  if sub(s, i, i) ~= "{" then
    return nil
  end
  local members = {}
  local j = skip_ws(s, i + 1)
  if sub(s, j, j) == "}" then
    return members
  end
  while true do
    if sub(s, j, j) ~= '"' then
      return nil
    end
    local name_end = skip_string(s, j)
    if name_end == nil then
      return nil
    end
    local name = decode_name(sub(s, j + 1, name_end - 2))
    j = skip_ws(s, name_end)
    if sub(s, j, j) ~= ":" then
      return nil
    end
    local from = skip_ws(s, j + 1)
    local to = skip_value(s, from)
    if to == nil then
      return nil
    end
    members[#members + 1] = {name = name, from = from, to = to}
    j = skip_ws(s, to)
    local c = sub(s, j, j)
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
  return sub(s, 1, from - 1) .. text .. sub(s, to)
end

-- The body with stream_options.include_usage turned on (nil when it is on already), or nil and
-- the reason it cannot be.
local function with_usage_requested(body)
  if body == nil then
    return nil, "The request has no body."
  end
  local start = skip_ws(body, 1)
  local root = object_members(body, start)
  if root == nil then
    return nil, "The request body is not a JSON object this gateway can read."
  end
  local stream = member(root, "stream")
  if stream == nil or sub(body, stream.from, stream.to - 1) ~= "true" then
    return nil, "The request is not a stream."
  end
  local options = member(root, "stream_options")
  if options == nil then
    return splice(body, start + 1, start + 1, '"stream_options":{"include_usage":true},')
  end
  if sub(body, options.from, options.to - 1) == "null" then
    return splice(body, options.from, options.to, '{"include_usage":true}')
  end
  local inner = object_members(body, options.from)
  if inner == nil then
    return nil, "'stream_options' must be an object."
  end
  local include_usage = member(inner, "include_usage")
  if include_usage == nil then
    local separator = ""
    if #inner > 0 then
      separator = ","
    end
    return splice(body, options.from + 1, options.from + 1, '"include_usage":true' .. separator)
  end
  if sub(body, include_usage.from, include_usage.to - 1) == "true" then
    return nil
  end
  return splice(body, include_usage.from, include_usage.to, "true")
end

function envoy_on_request(request_handle)
  local _, stream_usage = usage_format(request_handle)
  if stream_usage ~= "1" then
    return
  end
  local body = request_handle:body()
  local bytes = nil
  if body ~= nil and body:length() > 0 then
    bytes = body:getBytes(0, body:length())
  end
  local rewritten, problem = with_usage_requested(bytes)
  if problem ~= nil then
    -- Forwarded, this stream would not report its usage: refused here (and its hold voided).
    request_handle:respond(
      {[":status"] = "400", ["content-type"] = "application/json"},
      '{"error":{"message":"' .. problem .. ' A streamed request must be a JSON object with '
        .. '\\"stream\\": true and an object (or nothing) as \\"stream_options\\".",'
        .. '"type":"invalid_request_error","code":"invalid_stream_options"}}')
    return
  end
  if rewritten ~= nil then
    body:setBytes(rewritten)
  end
end
