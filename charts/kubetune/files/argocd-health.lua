-- Argo CD health check for kubetune.io/FineTuneJob (Lua 5.1, as Argo CD's gopher-lua runs it).
-- Install it in argocd-cm as resource.customizations.health.kubetune.io_FineTuneJob
-- (docs/gitops.md); tests/unit/test_argocd_health.py runs it in a real Lua 5.1, and
-- tests/cluster/test_retraining_loop.py on each status of a GitOps retraining loop.
--
--   observedGeneration < generation          -> Progressing (the operator has not seen the edit)
--   phase Failed, or condition Stalled=True  -> Degraded    (message: the condition's reason/message)
--   Promoted=False, reason PromotionFailed   -> Degraded    (the serving model was not updated)
--   phase Suspended                          -> Suspended   (spec.suspend: true)
--   phase Succeeded, or condition Ready=True -> Healthy     (with Promoted=False NotBetter, the
--                                               message adds why the model was not promoted)
--   anything else                            -> Progressing (phase and training progress)
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local text = c.message or fallback
  if c.reason ~= nil and c.reason ~= "" then
    text = c.reason .. ": " .. text
  end
  return text
end

local generation = 0
if obj.metadata ~= nil and obj.metadata.generation ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the FineTuneJob"
  return hs
end

-- A condition written for an older generation says nothing about the current spec.
local function current(c)
  if c == nil or c.observedGeneration == nil then
    return c
  end
  if c.observedGeneration < generation then
    return nil
  end
  return c
end

if status.observedGeneration == nil or status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase or "Pending"
local stalled = current(condition(status.conditions, "Stalled"))
local ready = current(condition(status.conditions, "Ready"))

if phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = describe(stalled, "FineTuneJob failed")
  return hs
end

local promoted = current(condition(status.conditions, "Promoted"))
if promoted ~= nil and promoted.status == "False" and promoted.reason == "PromotionFailed" then
  hs.status = "Degraded"
  hs.message = describe(promoted, "promotion failed")
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "FineTuneJob is suspended (spec.suspend: true)"
  return hs
end

if phase == "Succeeded" or (ready ~= nil and ready.status == "True") then
  hs.status = "Healthy"
  hs.message = describe(ready, "FineTuneJob succeeded")
  if promoted ~= nil and promoted.status == "False" then
    hs.message = hs.message .. "; " .. describe(promoted, "not promoted")
  end
  return hs
end

hs.status = "Progressing"
hs.message = phase
local progress = status.progress
local reconciling = current(condition(status.conditions, "Reconciling"))
if progress ~= nil and progress.totalSteps ~= nil and progress.totalSteps > 0 then
  hs.message = phase .. ": step " .. tostring(progress.step or 0) .. "/" .. tostring(progress.totalSteps)
elseif status.message ~= nil and status.message ~= "" then
  hs.message = phase .. ": " .. status.message
elseif reconciling ~= nil and reconciling.message ~= nil and reconciling.message ~= "" then
  hs.message = phase .. ": " .. reconciling.message
end
return hs
