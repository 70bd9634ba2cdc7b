-- Clear spec.suspend: the operator resumes the run where it stopped.
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = false
return obj
