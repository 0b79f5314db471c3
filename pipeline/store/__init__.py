"""What a job leaves on disk: the clips with their records and latents (outputs), and the job
history with the measurements it keeps (history). Standard library, numpy and the video writers only."""
