-- Which hub holds a message or a reply while it works on it (issue 18): claimed by pushing next_attempt
-- forward for the lease's length; a hub that dies lets go when the lease ends.
ALTER TABLE outbound ADD COLUMN claimed_by TEXT
;;
ALTER TABLE inbound ADD COLUMN claimed_by TEXT
